/*
 * atop: a stand-in for bootstrap-table when its local copy is missing (the npm assets were
 * not installed). GX's Data Docs fill every table with `$(...).bootstrapTable({columns, data,
 * ...})`; without the plugin the pages would show empty tables. This draws the same columns
 * and rows as a plain Bootstrap table (no sorting, search or filters); rows whose
 * `rowAttributes` give a `data-href` open that page when clicked. With the real plugin loaded
 * it does nothing.
 */
(function ($) {
  "use strict";
  if (!$ || $.fn.bootstrapTable) {
    return;
  }

  function named(option) {
    return typeof option === "string" ? window[option] : option;
  }

  $.fn.bootstrapTable = function (options) {
    if (typeof options !== "object" || options === null) {
      return this; // method calls such as 'clearFilterControl'
    }
    var columns = options.columns || [];
    var rowAttributes = named(options.rowAttributes);
    return this.each(function () {
      var $table = $(this).empty().addClass("table table-bordered table-hover atop-fallback-table");
      var $head = $("<tr>");
      columns.forEach(function (column) {
        $head.append($("<th>").text(column.title || column.field || ""));
      });
      $table.append($("<thead>").append($head));
      var $body = $("<tbody>");
      (options.data || []).forEach(function (row, index) {
        var $row = $("<tr>");
        var attributes = typeof rowAttributes === "function" ? rowAttributes(row, index) : {};
        $.each(attributes || {}, function (name, value) {
          if (name === "class") {
            $row.addClass(value);
          } else if (value !== undefined && value !== null) {
            $row.attr(name, value);
          }
        });
        if ($row.attr("data-href")) {
          $row.css("cursor", "pointer").on("click", function (event) {
            if (!$(event.target).closest("a").length) {
              window.location = $row.attr("data-href");
            }
          });
        }
        columns.forEach(function (column) {
          var value = row[column.field];
          $row.append($("<td>").html(value === undefined || value === null ? "" : String(value)));
        });
        $body.append($row);
      });
      $table.append($body);
    });
  };
})(window.jQuery);
