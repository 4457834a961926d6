// Log Analytics, workspace-based Application Insights and the gateway's workbook.
// Local (instrumentation key) authentication is off: the gateway and the Functions host send telemetry with the
// managed identity (APPLICATIONINSIGHTS_AUTHENTICATION_STRING), which needs Monitoring Metrics Publisher.

param logAnalyticsName string
param appInsightsName string
param location string
param tags object

@minValue(30)
@maxValue(730)
param retentionInDays int = 30

@description('Display name of the workbook in the portal.')
param workbookDisplayName string = 'AI gateway'

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
    // Queries and ingestion with Microsoft Entra ID only (no workspace keys), like Application Insights.
    features: {
      disableLocalAuth: true
    }
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logAnalytics.id
    IngestionMode: 'LogAnalytics'
    DisableLocalAuth: true
    // Keeps the token metrics' dimensions (consumer, deployment, backend...) in the metrics store too, as API
    // Management's token metrics need; the property is not in the published type definitions yet.
    #disable-next-line BCP037
    CustomMetricsOptedInType: 'WithDimensions'
  }
}

// The workbook's content is maintained in workbook.json (the serializedData of an Azure Monitor workbook); its
// fallbackResourceIds placeholder becomes this Application Insights resource, so the workbook opens on it.
resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, appInsights.id, 'ai-gateway-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: workbookDisplayName
    category: 'workbook'
    version: 'Notebook/1.0'
    serializedData: replace(loadTextContent('../workbook.json'), '{appinsights-id}', appInsights.id)
    sourceId: appInsights.id
  }
}

output appInsightsId string = appInsights.id
output appInsightsName string = appInsights.name
output logAnalyticsId string = logAnalytics.id
output workbookId string = workbook.id
