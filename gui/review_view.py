"""Review in the window: the bar above a result that says whether it waits for a person
and offers the three decisions, and the dialog that signs one off, where the reviewer
may also enter what the laboratory confirmed (the diagnosis, FISH markers, the
karyotype, a panel's mutations)."""

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

from appliance.results import DECISION_WORDS, ConfirmedFindings, FindingsError
from appliance.results.schema import ISCN_EXAMPLE
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


def split_entries(text: str) -> list[str]:
    """A field of several entries, split at each comma or semicolon outside brackets:
    "t(11;14), del(17p)" is two markers. An empty field is none; an empty entry between
    two separators is kept, for the check to name."""
    if not text.strip():
        return []
    entries, depth, start = [], 0, 0
    for at, char in enumerate(text):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if char in ",;" and depth <= 0:
            entries.append(text[start:at])
            start = at + 1
    return [*entries, text[start:]]


def confirmed_text(findings: ConfirmedFindings) -> str:
    """ "Confirmed: FISH t(11;14), del(17p) · Karyotype 46,XY[20]", as rich text."""
    parts = [f"{what} {html.escape(wrappable(text))}" for what, text in findings.lines()]
    return "Confirmed: " + " · ".join(parts)


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
        if review.confirmed is not None:
            text += f"<br>{confirmed_text(review.confirmed)}"
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
    and offered again after; Enter signs, Escape cancels. What the laboratory confirmed
    is optional, several markers or mutations separated by commas; signing a signed
    result again offers what was confirmed before. A finding that cannot be kept is
    said under the fields, and nothing is signed until it is put right."""

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
        before = state.review.confirmed if state.review is not None else None
        self.diagnosis = self._field(
            "Confirmed diagnosis",
            before.diagnosis if before else "",
            "optional: the diagnosis the laboratory confirmed",
        )
        self.fish = self._field(
            "FISH markers",
            ", ".join(before.fish) if before else "",
            "optional: markers FISH found, e.g. t(11;14), del(17p)",
        )
        self.karyotype = self._field(
            "Karyotype", before.karyotype if before else "", f"optional: ISCN, e.g. {ISCN_EXAMPLE}"
        )
        self.mutations = self._field(
            "Mutations",
            ", ".join(before.mutations) if before else "",
            "optional: a panel's, e.g. KRAS G12D, TP53 R273H",
        )
        self.problem = QLabel()
        self.problem.setObjectName("findings_problem")
        self.problem.setWordWrap(True)
        self.problem.setStyleSheet("color:#b00020;")
        self.problem.setAccessibleName("What cannot be kept")
        form = QFormLayout()
        form.addRow("&Reviewer:", self.name)
        form.addRow("R&eason:", self.reason)
        form.addRow("&Diagnosis:", self.diagnosis)
        form.addRow("&FISH:", self.fish)
        form.addRow("&Karyotype:", self.karyotype)
        form.addRow("&Mutations:", self.mutations)
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
        layout.addWidget(self.problem)
        layout.addWidget(self.buttons)
        fields = (self.diagnosis, self.fish, self.karyotype, self.mutations)
        for field in (self.name, self.reason, *fields):
            field.textChanged.connect(self._check)
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

    @staticmethod
    def _field(name: str, text: str, placeholder: str) -> QLineEdit:
        field = QLineEdit(text)
        field.setAccessibleName(name)
        field.setPlaceholderText(placeholder)
        return field

    def findings(self) -> ConfirmedFindings | None:
        """What the reviewer entered as confirmed (None: nothing); FindingsError says what
        cannot be kept."""
        return ConfirmedFindings.entered(
            diagnosis=self.diagnosis.text(),
            fish=split_entries(self.fish.text()),
            karyotype=self.karyotype.text(),
            mutations=split_entries(self.mutations.text()),
        )

    def _check(self) -> None:
        named = bool(self.name.text().strip())
        reasoned = self.decision != "rejected" or bool(self.reason.text().strip())
        try:
            self.findings()
            problem = ""
        except FindingsError as exc:
            problem = f"Confirmed findings: {exc}"
        self.problem.setText(problem)
        self.problem.setVisible(bool(problem))
        self.ok.setEnabled(named and reasoned and not problem)

    def accept(self) -> None:  # Enter in a field lands here too: never sign half a form
        if self.ok.isEnabled():
            super().accept()

    def sign_off(self) -> SignOff:
        return SignOff(
            self.decision,  # type: ignore[arg-type]
            self.name.text().strip(),
            self.reason.text().strip(),
            self.findings(),
        )
