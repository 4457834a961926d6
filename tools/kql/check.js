// Parses and type-checks KQL with Microsoft's own Kusto language service (@kusto/language-service-next), against the
// tables and columns given on stdin. Reads {"tables": {name: {column: type}}, "queries": [{"id", "text"}]} and writes
// [{"id", "diagnostics": [{"severity", "code", "message", "line", "column", "text"}]}]: every diagnostic, errors first.
'use strict';

require('@kusto/language-service-next/bridge.js');
require('@kusto/language-service-next');

const Kusto = globalThis.Kusto;
const { Symbols, GlobalState, KustoCode } = Kusto.Language;

function globalsFor(tables) {
  const symbols = Object.entries(tables).map(([name, columns]) => {
    const schema = '(' + Object.entries(columns).map(([c, t]) => `['${c}']:${t}`).join(', ') + ')';
    return new Symbols.TableSymbol.$ctor7(name, schema, null);
  });
  const database = new Symbols.DatabaseSymbol.$ctor2('appinsights', null, symbols);
  return GlobalState.Default.WithDatabase(database);
}

function position(text, offset) {
  const before = text.slice(0, offset).split('\n');
  return { line: before.length, column: before[before.length - 1].length + 1 };
}

function check(globals, query) {
  const code = KustoCode.ParseAndAnalyze(query.text, globals);
  const found = code.GetDiagnostics();
  const diagnostics = [];
  for (let i = 0; i < found.Count; i++) {
    const d = found.getItem(i);
    diagnostics.push({
      severity: String(d.Severity),
      code: String(d.Code),
      message: String(d.Message),
      ...position(query.text, d.Start),
      text: query.text.substr(d.Start, Math.max(d.Length, 1)),
    });
  }
  return { id: query.id, diagnostics };
}

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const request = JSON.parse(input);
  const globals = globalsFor(request.tables);
  process.stdout.write(JSON.stringify(request.queries.map((q) => check(globals, q))));
});
