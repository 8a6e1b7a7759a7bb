library(testthat)
library(scdistill)

test_check("scdistill")
