"""The seeded synthetic world the demo models and the feature store share."""
