"""The training engine every method runs on: the loop, model selection, save points and exact
resume, the run log, what a train script does."""
