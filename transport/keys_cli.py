"""``o2o-keys``: make and revoke the CURVE keys of a learner and its actors (transport/security.py).

    o2o-keys init KEYS                 # the learner's key pair, an empty allow-list
    o2o-keys add KEYS robot-1 robot-2  # per-actor key pairs, allowed; copy KEYS/actors/robot-1 to robot-1
    o2o-keys revoke KEYS robot-2       # a running learner refuses robot-2 within a second
    o2o-keys list KEYS
"""

from __future__ import annotations

import argparse
import sys

from .security import SecurityError, add_actor, init_keys, list_actors, revoke_actor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="o2o-keys", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="make the learner's key pair and an empty allow-list")
    init.add_argument("keys")
    init.add_argument("--force", action="store_true", help="replace existing learner keys")
    add = commands.add_parser("add", help="make actors' key pairs and allow them")
    add.add_argument("keys")
    add.add_argument("actor_ids", nargs="+")
    revoke = commands.add_parser("revoke", help="remove actors from the allow-list and delete their keys")
    revoke.add_argument("keys")
    revoke.add_argument("actor_ids", nargs="+")
    listing = commands.add_parser("list", help="the allowed actors")
    listing.add_argument("keys")
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            folder = init_keys(args.keys, args.force)
            print(f"learner keys in {folder}: pass keys={folder} to o2o-learner; learner.key_secret stays here")
        elif args.command == "add":
            for actor_id in args.actor_ids:
                actor_dir = add_actor(args.keys, actor_id)
                print(f"actor {actor_id}: allowed; copy {actor_dir} to it and pass keys=<that folder> to o2o-actor")
        elif args.command == "revoke":
            for actor_id in args.actor_ids:
                revoke_actor(args.keys, actor_id)
                print(f"actor {actor_id}: revoked (a running learner refuses it within a second)")
        else:
            print("\n".join(list_actors(args.keys)) or "(no actors allowed)")
    except (SecurityError, OSError) as err:
        print(f"o2o-keys: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
