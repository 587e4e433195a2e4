"""Fine-tune a transformer on CoLA: the BERT tutorial's experiment on the Hugging Face stack.

    python experiments/cola.py [experiments/recipes/tutorial.yaml] [--flags]
    accelerate launch experiments/cola.py experiments/recipes/tutorial.yaml

The command line is `cola_hf.cli.train` (also installed as `cola-train`, and `cola_hf.train(...)` from Python);
the run itself is `cola_hf.run`.
"""

import sys

from cola_hf.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
