// Starts the API documentation page (/docs: Swagger UI, /redoc: Redoc) from a file of this server: the
// pages' content security policy allows no inline script. The page gives the OpenAPI document's URL, and
// Redoc the nonce that lets it write its styles.
(function () {
  const swagger = document.getElementById("swagger-ui");
  if (swagger) {
    window.ui = SwaggerUIBundle({
      url: swagger.dataset.url,
      dom_id: "#swagger-ui",
      layout: "BaseLayout",
      deepLinking: true,
      showExtensions: true,
      showCommonExtensions: true,
      validatorUrl: null, // else Swagger UI asks validator.swagger.io about the document
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
    });
  }
  const redoc = document.getElementById("redoc");
  if (redoc) Redoc.init(redoc.dataset.specUrl, { nonce: redoc.dataset.nonce }, redoc);
})();
