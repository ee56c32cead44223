"""The ``tally`` command's parts below :mod:`tally.cli`: shared options and output
(``common``), the client commands (``clients``) and the listening check (``listen``)."""
