"""The one exception type for errors a user can cause."""


class MemeditError(Exception):
    """A user-facing error: the message says what was wrong and what to do. The CLI prints it in one line
    and exits with code 2."""


class RowsChanged(MemeditError):
    """A patch's old rows are not what the folder holds now (another writer, or a patch applied since it was made).
    ``detail`` says which rows, without the advice of the message."""

    def __init__(self, detail: str, advice: str):
        super().__init__(f"{detail}; {advice}")
        self.detail = detail
