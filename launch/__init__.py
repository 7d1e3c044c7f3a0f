"""The launchers: o2o-launch (launch.py), o2o-experiment (experiment.py) and the command lines they start
(commands.py). They start o2o's commands as processes and import no torch; nothing imports them."""
