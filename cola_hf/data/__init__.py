"""CoLA and BLiMP: sources in, `datasets` out."""
