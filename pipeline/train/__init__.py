"""Training from a cache: the one epoch planner, the dataset the student stage and users' loops
share, the losses, the tasks (classification, tokens), the training loop students and teachers
share with its checkpoints and completion record, teacher fitting, and metrics. Imports the layers
below (core, format, inputs, models)."""
