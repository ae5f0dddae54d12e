"""Speed-ups applied to a model or a loop, each tested equal to the algorithm it replaces."""
