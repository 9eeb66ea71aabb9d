// Starts Swagger UI on the gateway's own document. A file, not an inline script, so that the page's
// Content-Security-Policy can allow scripts from this origin only.
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null, // the default sends the document to an outside validator service
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
