"""Getting images onto nodes before they are needed: pins, workload watches, runtime import."""
