"""What a person sets and what is allowed: option names, their checks, the studio's caps, the model catalog and the errors that are the user's."""
