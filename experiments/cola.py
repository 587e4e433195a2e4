"""Fine-tune a transformer on CoLA: the BERT tutorial's experiment on the Hugging Face stack.

    python experiments/cola.py [experiments/recipes/tutorial.yaml] [--flags]
    accelerate launch experiments/cola.py experiments/recipes/tutorial.yaml

The run itself is `cola_hf.run` (also installed as `cola-train`, and `cola_hf.train(...)` from Python).
"""

import sys

from cola_hf.run import main

if __name__ == "__main__":
    sys.exit(main())
