"""How every command-line tool of the project runs: absl flags, quiet logs, one line per mistake.

    from sccorr_jax import cli
    ...
    if __name__ == '__main__':
      cli.run(main)

`run(main)` is `absl.app.run(main)` plus:

* **One line for a user's mistake.** A missing or unreadable config file, a mistyped
  `--config.a.b` override, a bad config variant, a missing required flag, a file that does not
  exist or already exists, a checkpoint/image/keypoint file that cannot be used (the exception
  classes of `USER_ERRORS` and `USER_ERROR_NAMES`) ends the program with ONE line on stderr,
  `error: <what>: <why>`, and exit status 2. `--verbose` adds the traceback. Anything else (a
  bug) keeps its traceback.
* **A config file is checked before anything heavy is imported**: `--config=missing.py` fails
  in a fraction of a second, before JAX starts.
* **`--help` exits 0** (absl exits 1) and `-h` is accepted; a config flag without a default does
  not show `(default: 'None')`.
* **Quiet, truthful library logs** (`quiet_libraries`): lines that a normal run prints many times
  or that are misleading are dropped or reworded; real warnings stay. `--verbose` keeps them all.
"""

from __future__ import annotations

import logging as pylogging
import os
import pathlib
import sys
import traceback
from typing import Callable, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

if 'verbose' not in flags.FLAGS:  # a tool may define its own --verbose with the same meaning
  flags.DEFINE_bool(
      'verbose',
      False,
      'On an error, print the traceback too; keep the library '
      'log lines that are normally dropped.',
  )

EXIT_USER_ERROR = 2
# The repository checkout this package lives in (configs/ beside sccorr_jax/), for hints.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Exceptions that a user causes (wrong path, wrong file, wrong value) and whose message names
# the file or flag: one line, no traceback. Project classes are looked up by name at error time
# (a module that was never imported cannot have raised), so that importing this module stays
# cheap.
USER_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    app.UsageError,
)
USER_ERROR_NAMES = (
    'sccorr_jax.cli.UserError',
    'sccorr_jax.config_lib.ConfigFileError',
    'sccorr_jax.config_lib.ConfigError',
    'sccorr_jax.checkpoint.CheckpointError',
    'sccorr_jax.predict.CheckpointError',
    'sccorr_jax.predict.ImageError',
    'sccorr_jax.predict.KeypointError',
    'sccorr_jax.convert.ConversionError',
    'sccorr_jax.data.records.PreparationError',
    'sccorr_jax.data.records.BadRecordError',
    'sccorr_jax.data.cache_features.CacheError',
    'sccorr_jax.export.SerializedModelError',
)


class UserError(Exception):
  """A mistake of the user's, with a message that names the file or flag and the problem."""


def user_error_classes() -> Tuple[type, ...]:
  """`USER_ERRORS` plus those of `USER_ERROR_NAMES` whose module is imported."""
  out = list(USER_ERRORS)
  for dotted in USER_ERROR_NAMES:
    module, _, name = dotted.rpartition('.')
    cls = getattr(sys.modules.get(module), name, None)
    if isinstance(cls, type):
      out.append(cls)
  return tuple(out)


def one_line(text: str) -> str:
  """`text` with its line breaks replaced by '; ' (blank lines dropped)."""
  return '; '.join(s.strip() for s in str(text).splitlines() if s.strip())


def fail(message: str, exc: Optional[BaseException] = None) -> None:
  """Writes `error: <message>` (one line) to stderr and exits with status 2.

  With `--verbose`, the traceback of `exc` comes first.
  """
  if exc is not None and _verbose():
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.write(f'error: {one_line(message)}\n')
  sys.stderr.flush()
  sys.exit(EXIT_USER_ERROR)


def _verbose() -> bool:
  try:
    return bool(flags.FLAGS.verbose)
  except flags.UnparsedFlagAccessError:
    return any(a in ('--verbose', '-verbose', '--verbose=true', '--verbose=1') for a in sys.argv)


# ------------------------------------------------------------------------------------------------
# Library logs.


# (path fragment of the emitting file, highest level dropped, message prefix or None = any).
_DROPPED = (
    # tfds: we configure the synthetic builder on purpose, and do so on every iterator.
    ('/tensorflow_datasets/', pylogging.WARNING, 'Using custom data configuration'),
    # tfds: said of every dataset before it is generated for the first time.
    ('/tensorflow_datasets/', pylogging.WARNING, 'Variant folder'),
    # tfds: PIL decodes our small images; OpenCV is not a dependency.
    ('/tensorflow_datasets/', pylogging.WARNING, 'OpenCV is not installed'),
    # tfds: "Load dataset info from", "Done writing", "Generating dataset": once per iterator.
    ('/tensorflow_datasets/', pylogging.INFO, None),
    # Orbax: the trainer saves between evaluations without metrics (the best is decided only
    # where there are metrics).
    ('/orbax/', pylogging.WARNING, 'Requested `tracked_metric`'),
    # Orbax: exports and steps written by older Orbax versions carry no metadata file.
    ('/orbax/', pylogging.WARNING, 'Metadata file does not exist'),
    ('/orbax/', pylogging.INFO, None),
    # jax: "Unable to initialize backend 'tpu'" on every machine without a TPU.
    ('/jax/_src/xla_bridge.py', pylogging.INFO, None),
)


class LibraryChatter(pylogging.Filter):
  """Drops the library log lines of `_DROPPED`; everything else passes."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, '/')
    for fragment, level, prefix in _DROPPED:
      if fragment in path and record.levelno <= level:
        if prefix is None or str(record.msg).startswith(prefix):
          return False
    return True


_FILTER = LibraryChatter()


def _tfds_preparing(self) -> None:
  logging.info('preparing dataset %s in %s', self.name, self.data_dir)


def _tfds_prepared(self) -> None:
  logging.info('dataset %s prepared in %s', self.name, self.data_dir)


def quiet_libraries(progress_bars: bool = False) -> None:
  """Pins the library log lines a normal run should not print (idempotent; see `_DROPPED`).

  Attaches `LibraryChatter` to the absl handler and the root logger's handlers, and, if
  tensorflow_datasets is imported, replaces its "Downloading and preparing dataset Unknown
  size" / "downloaded and prepared" prints (said of datasets that download nothing) by one INFO
  line each, and (unless `progress_bars`) turns off its progress bars. Call again after a lazy
  import of tensorflow_datasets. No-op with `--verbose`.
  """
  if _verbose():
    return
  handlers = [logging.get_absl_handler()] + list(pylogging.getLogger().handlers)
  for handler in handlers:
    if _FILTER not in handler.filters:
      handler.addFilter(_FILTER)
  builder = sys.modules.get('tensorflow_datasets.core.dataset_builder')
  if builder is not None and hasattr(builder, 'DatasetBuilder'):
    cls = builder.DatasetBuilder
    if hasattr(cls, '_log_download_bytes'):
      cls._log_download_bytes = _tfds_preparing  # pylint: disable=protected-access
    if hasattr(cls, '_log_download_done'):
      cls._log_download_done = _tfds_prepared  # pylint: disable=protected-access
    if not progress_bars:
      tqdm_utils = sys.modules.get('tensorflow_datasets.core.utils.tqdm_utils')
      if tqdm_utils is not None and hasattr(tqdm_utils, 'disable_progress_bar'):
        tqdm_utils.disable_progress_bar()


# ------------------------------------------------------------------------------------------------
# Flags.


_HELP = (
    '--help',
    '-help',
    '--helpshort',
    '-helpshort',
    '--helpfull',
    '-helpfull',
    '-?',
    '--helpxml',
)


def _config_file_flags() -> list:
  """Names of the ml_collections config-file flags defined (`DEFINE_config_file`)."""
  parser_cls = config_flags.config_flags.ConfigFileFlagParser
  return [
      name
      for name, flag in flags.FLAGS._flags().items()  # pylint: disable=protected-access
      if name == flag.name and isinstance(flag.parser, parser_cls)
  ]


def _flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The last value given to `--name` in argv (`--name=v` or `--name v`), or None."""
  value = None
  args = list(argv[1:])
  for i, a in enumerate(args):
    if a == '--':
      break
    for prefix in (f'--{name}', f'-{name}'):
      if a.startswith(prefix + '='):
        value = a[len(prefix) + 1 :]
      elif a == prefix and i + 1 < len(args):
        value = args[i + 1]
  return value


def check_config_file(name: str, value: str) -> None:
  """Fails (one line) if the file part of `--name=FILE[:ARG]` is not a readable file."""
  path = value.split(':', 1)[0]
  if os.path.isfile(path):
    return
  where = 'is a directory' if os.path.isdir(path) else 'does not exist'
  hint = ''
  if not os.path.isabs(path):
    where += f' (relative to {os.getcwd()})'
    in_repo = REPO_ROOT / path
    if in_repo.is_file():
      hint = f'; did you mean --{name}={in_repo}' + (value[len(path) :])
  fail(f'--{name}={value}: config file {path} {where}{hint}')


def _from_config_flags(exc: BaseException) -> bool:
  """Whether `exc` was raised while ml_collections parsed a --config flag or override."""
  tb = exc.__traceback__
  while tb is not None:
    if 'config_flags' in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


def _flag_error_line(error: Exception) -> str:
  """One line for an absl flags error (required flag, bad value, bad config file)."""
  text = str(error)
  if 'must have a value other than None' in text:
    name = text.split('Flag --', 1)[-1].split(' ', 1)[0]
    return f'--{name} is required (see --help)'
  if 'Error whilst parsing config file' in text:
    # ml_collections puts the whole traceback of get_config() into the message: keep the flag
    # and the root cause (the last line), e.g. "ValueError: variant must be one of ...".
    head = text.split(': Error whilst parsing config file', 1)[0].replace('flag ', '', 1)
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    cause = lines[-1]
    for prefix in ('ValueError: ', 'TypeError: '):
      cause = cause[len(prefix) :] if cause.startswith(prefix) else cause
    return f'{head}: {cause}'
  if text.startswith('flag --'):
    text = text[len('flag ') :]
  return text


def _unknown_config_key_line(exc: BaseException, argv: Sequence[str]) -> str:
  root = exc
  while root.args and isinstance(root.args[0], BaseException):
    root = root.args[0]
  text = str(root.args[0]) if root.args else str(root)
  overrides = ' '.join(a for a in argv if a.startswith('--config.') or a.startswith('-config.'))
  return f'unknown config key in {overrides}: {text}'


def parse_flags(argv: Sequence[str]) -> list:
  """absl's flag parsing with one line per mistake (`flags_parser` of `app.run`)."""
  argv = ['--help' if a == '-h' else a for a in argv]
  help_wanted = any(a in _HELP for a in argv[1:])
  for name in _config_file_flags():
    flag = flags.FLAGS[name]
    if flag.default is None:
      flag.default_as_str = None  # not "(default: 'None')"
    value = _flag_value(argv, name)
    if value is not None and not help_wanted:
      check_config_file(name, value)
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:
    if help_wanted and e.code == 1:  # absl's --help exits 1
      raise SystemExit(0) from None
    raise
  except flags.Error as e:
    fail(_flag_error_line(e), e)
  except (AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError, ImportError) as e:
    if not _from_config_flags(e):
      raise
    if isinstance(e, (AttributeError, KeyError)):
      fail(_unknown_config_key_line(e, argv), e)
    fail(f'--config={_flag_value(argv, "config")}: {type(e).__name__}: {e}', e)
  return []  # not reached


def run(
    main: Callable[[list], Optional[int]],
    *,
    progress_bars: bool = False,
    argv: Optional[Sequence[str]] = None,
) -> None:
  """`absl.app.run(main)` with one-line user errors and quiet library logs (module docstring).

  Args:
    main: the tool's main(argv); its return value is the exit status.
    progress_bars: keep tensorflow_datasets' progress bars (dataset preparation).
    argv: default sys.argv.
  """

  def wrapped(args):
    quiet_libraries(progress_bars)
    try:
      return main(args)
    except user_error_classes() as e:  # pylint: disable=catching-non-exception
      fail(_describe(e), e)
    except Exception as e:  # pylint: disable=broad-except
      # A config read lazily (ml_collections defers a file's IOError to the first access).
      if _from_config_flags(e) and isinstance(e, OSError):
        fail(f'--config: {e}', e)
      raise

  app.run(wrapped, argv=list(argv) if argv is not None else None, flags_parser=parse_flags)


def _describe(e: BaseException) -> str:
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    return f'{e.filename}: {e.strerror}'
  if isinstance(e, KeyError) and e.args:
    return str(e.args[0])
  text = str(e)
  return text or type(e).__name__


def existing_path(flag_name: str, path: Optional[str], kind: str = 'file') -> None:
  """Fails (one line) unless `path` exists ('file', 'dir' or 'any')."""
  if path is None:
    return
  ok = {'file': os.path.isfile, 'dir': os.path.isdir, 'any': os.path.exists}[kind](path)
  if not ok:
    what = {'file': 'no such file', 'dir': 'no such directory', 'any': 'no such file or directory'}[
        kind
    ]
    if kind == 'file' and os.path.isdir(path):
      what = 'is a directory, not a file'
    fail(f'--{flag_name}={path}: {what}')


def new_output_dir(flag_name: str, path: str) -> None:
  """Fails (one line) if `path` exists and is not a directory (checked before any work)."""
  if os.path.exists(path) and not os.path.isdir(path):
    fail(f'--{flag_name}={path}: exists and is a file, not a directory')
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    fail(f'--{flag_name}={path}: {parent} is a file, not a directory')
  if not os.access(parent if not os.path.isdir(path) else path, os.W_OK):
    fail(f'--{flag_name}={path}: not writable')
