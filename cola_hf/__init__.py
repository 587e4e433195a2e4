"""cola-hf: the BERT-on-CoLA tutorial rebuilt on the Hugging Face Trainer."""

__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202
    # `from cola_hf import train` for notebooks, without loading torch for every `import cola_hf`
    # (cola-predict answers bad input before the heavy libraries load).
    if name == "train":
        from cola_hf.cli.train import train

        return train
    raise AttributeError(f"module 'cola_hf' has no attribute {name!r}")
