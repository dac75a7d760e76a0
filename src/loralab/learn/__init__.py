"""Learning center: the course (ja + en), quizzes, progress, the LoRA calculator and the `loralab learn` CLI."""
