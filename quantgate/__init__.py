"""quantgate: make every quantized LLM engine earn its release.

Stages (one module each): recipe -> calibrate -> export -> engines -> evaluation -> gate -> tracking.
Heavy libraries (torch, modelopt, lm_eval, mlflow, tensorrt_llm) are imported inside the stage
that needs them, so the CLI answers fast.
"""

__version__ = "0.1.0"
