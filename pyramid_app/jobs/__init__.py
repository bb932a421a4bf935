"""Running generation jobs: the saved queue, its runner, output files written as units finish, and runs that span torchrun's ranks."""
