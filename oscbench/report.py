"""`python -m oscbench.report DIR`: the comparison table and figures of a sweep's records
(`oscbench.analysis.report`)."""

from oscbench.analysis.report import main

if __name__ == "__main__":
    main()
