"""gptlab entry point: `python main.py {fit,validate,test,predict} --config configs/...yaml` (and `export`)."""

from gptlab.cli import main

if __name__ == "__main__":
    main()
