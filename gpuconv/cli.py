"""What every `python -m gpuconv COMMAND` parser shares: help that shows each option's default."""
import argparse
import copy


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
