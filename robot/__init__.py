"""Real arms as o2o actors: LeRobot-interface robots, reward and resets without a simulator, safety, interventions."""
