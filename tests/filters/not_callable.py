"""filter_end is not a function (line 4)."""

GREETING = "hi"
filter_end = 42
