"""Request → domain → adapter routing (classifiers, policy, experiments)."""
