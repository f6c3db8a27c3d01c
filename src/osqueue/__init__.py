"""osqueue: a distributed job queue whose whole state is one JSON document on object storage."""
