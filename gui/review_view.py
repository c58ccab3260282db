"""Review in the window: the bar above a result that says whether it waits for a person
and offers the three decisions, and the dialog that signs one off."""

from __future__ import annotations

import html

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from appliance.results import DECISION_WORDS
from appliance.review.sign_off import SignOff
from gui.review_state import ReviewState
from gui.text import wrappable

# (decision, what the reviewer does, button text with its Alt mnemonic, window shortcut)
DECISIONS = (
    ("accepted", "Accept", "Acc&ept", "Ctrl+Shift+A"),
    ("rejected", "Reject", "Re&ject...", "Ctrl+Shift+X"),
    ("sent_for_fish", "Send for FISH", "Send for F&ISH", "Ctrl+Shift+H"),
)
VERBS = {decision: verb for decision, verb, _, _ in DECISIONS}
BAR_STYLES = {
    "waiting": "QFrame#review_bar { background:#fff3cd; border:1px solid #b36b00; }",
    "signed": "QFrame#review_bar { background:#e8eef6; border:1px solid #1f5fa8; }",
    "none": "QFrame#review_bar { background:#f2f2f2; border:1px solid #bbbbbb; }",
}


def review_text(state: ReviewState | None) -> tuple[str, str]:
    """(style, rich text) the bar shows for a case's review state."""
    if state is None:
        return "none", "No result to sign off yet."
    if state.review is not None:
        review = state.review
        words = DECISION_WORDS[review.decision]
        text = (
            f"<b>{words}</b> by {html.escape(review.reviewer)} · "
            f"{html.escape(review.signed_at.replace('T', ' ')[:16])} UTC · "
            f"version {review.reviewed_version} reviewed"
        )
        if review.reason:
            text += f"<br>Reason: {html.escape(wrappable(review.reason))}"
        return "signed", text
    if state.waiting:
        # "no call: <reason>" is the banner's sentence already: the bar names it only.
        said = [r.split(":", 1)[0] if r.startswith(("no call:", "rejected:")) else r
                for r in state.waiting]  # fmt: skip
        return "waiting", f"<b>To review:</b> {html.escape(wrappable('; '.join(said)))}"
    return "none", "Needs no review; it may be signed off all the same."


class ReviewBar(QFrame):
    """Whether the shown result waits for a person, and the decisions (buttons)."""

    decided = Signal(str)  # the decision a button asks for

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("review_bar")
        self.text = QLabel()
        self.text.setWordWrap(True)
        self.text.setAccessibleName("Review")
        self.buttons: dict[str, QPushButton] = {}
        row = QHBoxLayout()
        row.addStretch(1)
        for decision, verb, label, keys in DECISIONS:
            button = QPushButton(label)
            button.setToolTip(f"{verb} this result ({keys})")
            button.clicked.connect(lambda _=False, d=decision: self.decided.emit(d))
            self.buttons[decision] = button
            row.addWidget(button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 4, 8, 4)
        layout.setSpacing(2)
        layout.addWidget(self.text)
        layout.addLayout(row)
        self.show_state(None)

    def show_state(self, state: ReviewState | None) -> None:
        style, text = review_text(state)
        self.setStyleSheet(BAR_STYLES[style])
        self.text.setText(text)
        for button in self.buttons.values():
            button.setEnabled(state is not None)


class SignOffDialog(QDialog):
    """One decision on one result, in the reviewer's name; a rejection needs a reason.

    The name is asked once per session (from the workstation login the first time)
    and offered again after; Enter signs, Escape cancels."""

    def __init__(
        self,
        decision: str,
        case_key: str,
        state: ReviewState,
        reviewer: str,
        *,
        name_confirmed: bool,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setObjectName("sign_off_dialog")
        self.decision = decision
        verb = VERBS[decision]
        self.setWindowTitle(f"{verb}: case {case_key}")
        about = QLabel(self._about(case_key, state))
        about.setWordWrap(True)
        self.name = QLineEdit(reviewer)
        self.name.setAccessibleName("Reviewer's name")
        self.reason = QLineEdit()
        self.reason.setAccessibleName("Reason")
        self.reason.setPlaceholderText(
            "required: why the result is rejected" if decision == "rejected" else "optional note"
        )
        form = QFormLayout()
        form.addRow("&Reviewer:", self.name)
        form.addRow("R&eason:", self.reason)
        self.buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
        )
        self.ok = self.buttons.button(QDialogButtonBox.StandardButton.Ok)
        self.ok.setText(verb)
        self.ok.setDefault(True)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(about)
        layout.addLayout(form)
        layout.addWidget(self.buttons)
        self.name.textChanged.connect(self._check)
        self.reason.textChanged.connect(self._check)
        self._check()
        self.resize(560, self.sizeHint().height())
        if name_confirmed:
            self.reason.setFocus()
        else:
            self.name.selectAll()
            self.name.setFocus()

    @staticmethod
    def _about(case_key: str, state: ReviewState) -> str:
        lines = [f"<b>Case {html.escape(case_key)}</b>, result version {state.version}."]
        if state.review is not None:
            words = DECISION_WORDS[state.review.decision].lower()
            lines.append(
                f"Already {html.escape(words)} by {html.escape(state.review.reviewer)}: "
                "this sign-off becomes a new version; the earlier one stays."
            )
        elif state.waiting:
            lines.append(f"Waits for review: {html.escape('; '.join(state.waiting))}.")
        return "<br>".join(lines)

    def _check(self) -> None:
        named = bool(self.name.text().strip())
        reasoned = self.decision != "rejected" or bool(self.reason.text().strip())
        self.ok.setEnabled(named and reasoned)

    def accept(self) -> None:  # Enter in a field lands here too: never sign half a form
        if self.ok.isEnabled():
            super().accept()

    def sign_off(self) -> SignOff:
        return SignOff(self.decision, self.name.text().strip(), self.reason.text().strip())  # type: ignore[arg-type]
