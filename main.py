"""gptlab entry point: `python main.py {fit,validate,test,predict,export} --config configs/...yaml`."""

from gptlab.cli import main

if __name__ == "__main__":
    main()
