// Lets the vendored xterm.js draw under the page's Content-Security-Policy
// without 'unsafe-inline'. xterm builds <style> elements and sets style
// attributes at run time; the policy refuses both unless a <style> carries
// this response's nonce. So, before xterm loads:
// - every <style> made with createElement gets the nonce (set before it is
//   inserted, which is when the policy checks it);
// - setAttribute("style", …) goes through the CSSOM (element.style.cssText),
//   which the policy does not restrict: the same styles, from our own scripts.
// Markup parsed from elsewhere gets neither: its inline styles stay refused.
(function () {
  "use strict";
  const meta = document.querySelector('meta[name="csp-nonce"]');
  const nonce = meta ? meta.content : "";
  const create = Document.prototype.createElement;
  Document.prototype.createElement = function (tag, options) {
    const el = create.call(this, tag, options);
    if (nonce && String(tag).toLowerCase() === "style") el.nonce = nonce;
    return el;
  };
  const setAttribute = Element.prototype.setAttribute;
  Element.prototype.setAttribute = function (name, value) {
    if (String(name).toLowerCase() === "style" && this.style) {
      this.style.cssText = String(value);
      return;
    }
    return setAttribute.call(this, name, value);
  };
})();
