"""Workers: the GPU worker that runs stage jobs, and the thermal monitor."""
