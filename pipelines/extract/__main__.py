"""``python -m pipelines.extract IMAGES --model SPEC --out STORE`` (the same as ``vlmlab extract``)."""

from pipelines.extract.job import main

if __name__ == "__main__":
    main()
