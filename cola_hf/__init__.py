"""cola-hf: the BERT-on-CoLA tutorial rebuilt on the Hugging Face Trainer."""

__version__ = "0.1.0"
