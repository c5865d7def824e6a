"""The operator's loop: scheduled retraining and its cron rules."""
