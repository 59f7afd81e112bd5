"""framecast.jobs — training, optimization, export and evaluation on Ray Train."""
