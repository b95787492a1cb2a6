"""`python -m oscbench.claims STUDY.yaml`: a claims study's sweeps run and each claim tested
on their runs (`oscbench.analysis.study`)."""

from oscbench.analysis.study import main

if __name__ == "__main__":
    main()
