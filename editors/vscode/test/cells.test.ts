import assert from 'node:assert/strict';
import { test } from 'node:test';
import { cellAt, findCells } from '../src/cells';

test('code before the first marker is the first cell', () => {
  const cells = findCells('import os\n\n# %% Load\nx = 1\n# %%\ny = 2\n');
  assert.deepEqual(
    cells.map(({ index, markerLine, title, startLine, endLine, code }) => ({ index, markerLine, title, startLine, endLine, code })),
    [
      { index: 0, markerLine: undefined, title: '', startLine: 0, endLine: 1, code: 'import os\n' },
      { index: 1, markerLine: 2, title: 'Load', startLine: 2, endLine: 3, code: 'x = 1' },
      { index: 2, markerLine: 4, title: '', startLine: 4, endLine: 6, code: 'y = 2\n' },
    ],
  );
});

test('a file that starts with a marker has no leading cell', () => {
  const cells = findCells('# %%\na = 1\n# %%\nb = 2');
  assert.deepEqual(
    cells.map((c) => [c.startLine, c.endLine, c.code]),
    [
      [0, 1, 'a = 1'],
      [2, 3, 'b = 2'],
    ],
  );
});

test('blank lines before the first marker are no cell', () => {
  const cells = findCells('\n  \n# %%\nx = 1');
  assert.equal(cells.length, 1);
  assert.equal(cells[0].index, 0);
  assert.equal(cellAt(cells, 0), undefined);
  assert.equal(cellAt(cells, 3), cells[0]);
});

test('a file without markers is one cell, an empty one none', () => {
  assert.deepEqual(
    findCells('print(1)\nprint(2)').map((c) => [c.startLine, c.endLine, c.code]),
    [[0, 1, 'print(1)\nprint(2)']],
  );
  assert.deepEqual(findCells(''), []);
});

test('markers as VS Code writes them, markdown cells, CRLF', () => {
  const cells = findCells('#%%\r\na = 1\r\n# %% [markdown]\r\n# Title\r\n#   %%   spaced  \r\nb = 2');
  assert.deepEqual(
    cells.map((c) => [c.kind, c.title, c.code]),
    [
      ['code', '', 'a = 1'],
      ['markdown', '[markdown]', '# Title'],
      ['code', 'spaced', 'b = 2'],
    ],
  );
  // Indented or mid-line markers are not markers, as in VS Code.
  assert.equal(findCells('x = 1\n  # %%\ny = "# %%"').length, 1);
});

test('cellAt finds the cell of a line, markers included', () => {
  const cells = findCells('a\n# %%\nb\nc\n# %%\nd');
  assert.deepEqual(
    [0, 1, 2, 3, 4, 5, 6].map((line) => cellAt(cells, line)?.index),
    [0, 1, 1, 1, 2, 2, undefined],
  );
});
