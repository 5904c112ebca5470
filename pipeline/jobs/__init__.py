"""Running an analysis: the job store, the runner, the step contract, the steps and the executors."""
