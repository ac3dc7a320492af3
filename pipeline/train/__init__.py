"""Training from a cache: the one epoch planner, the dataset the student stage and users' loops
share, the losses, and metrics. Imports the layers below (core, format, inputs, models)."""
