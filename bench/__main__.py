"""``python -m bench [overrides...]``: one evaluation (or a sweep with ``-m``)."""

from bench.run import main

if __name__ == "__main__":
    main()
