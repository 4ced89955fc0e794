"""`python -m peft_prompt_clip` (also under `accelerate launch -m peft_prompt_clip`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
