// The chapters' formulas (mkdocs.yml points the notebook pages here): MathJax 3 from the site
// itself, never from a CDN. tools/book.py copies MathJax's self-contained tex-svg-full.js beside
// this file. Delimiters as JupyterLab reads them: $...$ inline too.
window.MathJax = {
  tex: {inlineMath: [["$", "$"], ["\\(", "\\)"]], processEscapes: true},
  svg: {fontCache: "global"},
};
(function () {
  var script = document.createElement("script");
  script.src = document.currentScript.src.replace(/[^/]*$/, "tex-svg-full.js");
  script.async = true;
  document.head.appendChild(script);
})();
