"""lorashelf: modular LLMs from a library of LoRA experts.

Build a library (train or import PEFT LoRA adapters), cluster it (MBC), route over it
zero-shot (Arrow, PHATGOOSE), compose it few-shot (LoraHub), merge it, and evaluate
every method side by side on held-out tasks.
"""

__version__ = "0.1.0"
