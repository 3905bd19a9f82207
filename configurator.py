"""
Poor man's configurator, after nanoGPT's. A script keeps its config as plain module globals and calls
    configure(globals(), sys.argv[1:])
Each argument is either a config file (Python that assigns some of those globals, e.g.
config/sudoku_1gpu.py) or --key=value. Values are parsed as Python literals (falling back to a plain
string) and must have the type of the default. Unknown keys and type mismatches raise ConfigError, which
the scripts turn into one line with fail().
"""

import ast
import os
import sys


class ConfigError(Exception):
    pass


def fail(message, code=2):
    """Exit with one line on stderr: for bad arguments or input a traceback would only bury the reason.
    code 2 means bad usage, as with argparse."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_type(key, value, default):
    if default is None:  # no type to hold it to
        return value
    if isinstance(default, bool) or isinstance(value, bool):  # bool is an int subclass: keep them apart
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(value, type(default)):
        return value
    raise ConfigError(f"{key}={value!r} is a {type(value).__name__}, "
                      f"expected a {type(default).__name__} like the default {default!r}")


def configure(config, args):
    """Apply config files and --key=value overrides in order to the dict `config`, in place.
    Returns the list of keys that were set."""
    known = {k for k, v in config.items()
             if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))}
    changed = []
    for arg in args:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} not found")
            scope = {}
            try:
                exec(compile(open(arg).read(), arg, 'exec'), scope)
            except Exception as e:
                raise ConfigError(f"config file {arg}: {type(e).__name__}: {e}") from None
            for key, value in scope.items():
                if key.startswith('_') or callable(value) or type(value).__name__ == 'module':
                    continue  # imports and helper names a config file may use
                if key not in known:
                    raise ConfigError(f"config file {arg}: unknown config key {key!r}")
                config[key] = check_type(key, value, config[key])
                changed.append(key)
            continue
        key, sep, text = arg[2:].partition('=')
        if not sep:
            raise ConfigError(f"expected --key=value, got {arg!r}")
        if key not in known:
            raise ConfigError(f"unknown config key {key!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string such as --device=cuda
        if isinstance(config[key], str) and not isinstance(value, str):
            value = text  # a string key given a numeric-looking value, e.g. --wandb_run_name=2024
        config[key] = check_type(key, value, config[key])
        changed.append(key)
    return changed
