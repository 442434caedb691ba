"""What every `python -m gpuconv COMMAND` parser shares: help that shows each option's default, and
the parsing of option values more than one command takes (--widths)."""
import argparse
import copy
import numbers


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help with "(default: X)" after every option that has a default worth showing.

    argparse.ArgumentDefaultsHelpFormatter does the same but skips options without help text and
    prints "(default: None)" and "(default: False)" for flags; this one shows the default even
    where an option has no help, leaves out None and False (nothing to show), and trusts a help
    text that already names its default.
    """

    @staticmethod
    def _shows_default(action):
        # identity, not ==: a default of 0 (== False) is worth showing
        return (action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
                and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)))

    def _format_action(self, action):
        if not action.help and self._shows_default(action):
            action = copy.copy(action)  # the parser's own action keeps help=None
            action.help = ""
            action.help = self._get_help_string(action)
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if not self._shows_default(action) or "default" in text:
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        default = str(default).replace("%", "%%")
        return f"{text} (default: {default})".strip()


# --widths' ceiling: past it a SimpleCNN on 28x28 images is gigabytes of weights, far more likely a
# slip of the keyboard than a plan, and failed as a NumPy MemoryError traceback
MAX_WIDTH = 4096


def valid_widths(widths):
    """SimpleCNN's block widths as --widths (and a Trainer config) allow them: a list or tuple of 1 to 4
    ints in [1, MAX_WIDTH] (a bool is not a width)."""
    return (isinstance(widths, (list, tuple)) and 1 <= len(widths) <= 4
            and all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and 1 <= w <= MAX_WIDTH
                    for w in widths))


def parse_widths(text):
    """--widths "48,96,192" -> (48, 96, 192), for argparse: a clear error for anything else."""
    parts = [part.strip() for part in text.split(",")]
    # ASCII digits only: int() would also read "3_2" as 32 and other scripts' digits
    if all(part.isascii() and part.isdigit() for part in parts):
        widths = tuple(int(part) for part in parts)
    else:
        widths = ()
    if not valid_widths(widths):
        raise argparse.ArgumentTypeError(f"expected 1 to 4 positive ints up to {MAX_WIDTH} separated by commas "
                                         f"(e.g. 32,64,128), got {text!r}")
    return widths
