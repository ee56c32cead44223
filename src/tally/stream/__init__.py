"""Streams into and out of Tally: the Kafka source connector (``tally consume``)."""
