"""From records to findings: the runs frame and its cells, the comparison table and figures,
tests of differences, and the claims studies."""
