"""Route modules; each is a thin parse → authorise → service → shape layer."""
