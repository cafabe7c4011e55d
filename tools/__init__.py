"""Tools above the three stages: the GPU host self-test and the demo data set the tests share."""
