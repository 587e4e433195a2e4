"""Data sources and the data sets read from them (CoLA, BLiMP)."""
